"""fedmfs.export"""
