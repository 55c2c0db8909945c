"""relaydiff.models"""
