"""fedmfs.core"""
