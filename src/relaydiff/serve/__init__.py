"""relaydiff.serve"""
