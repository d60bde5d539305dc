"""fedmfs.learner"""
