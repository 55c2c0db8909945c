"""relaydiff.sched"""
