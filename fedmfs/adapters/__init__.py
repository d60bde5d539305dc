"""fedmfs.adapters"""
