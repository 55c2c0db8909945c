"""relaydiff.bench"""
