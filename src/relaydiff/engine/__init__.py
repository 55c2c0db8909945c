"""relaydiff.engine"""
