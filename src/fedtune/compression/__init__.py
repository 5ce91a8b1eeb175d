"""Compression on the split interfaces: SplitCom temporal reuse, threshold controllers, codecs, caches."""
