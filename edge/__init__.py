"""fedmfs.edge"""
