"""fedmfs.sim"""
