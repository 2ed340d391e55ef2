"""Framework-free utilities (EDM-pickle compatible names)."""

from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path']
