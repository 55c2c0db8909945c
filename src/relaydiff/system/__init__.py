"""relaydiff.system"""
