"""fedmfs.coordinator"""
