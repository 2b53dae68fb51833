"""Deployment files of kvrelay and the checks that keep them honest (deploy/validate.py)."""
