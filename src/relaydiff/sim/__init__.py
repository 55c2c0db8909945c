"""relaydiff.sim"""
