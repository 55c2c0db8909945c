"""relaydiff.quality"""
