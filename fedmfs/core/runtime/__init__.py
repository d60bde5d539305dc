"""fedmfs.core.runtime"""
