"""The V-cache method library: lib.vcache (the registry, the selector and
codec contracts, VCacheMethod), one file per method in lib/selectors/ and
lib/codecs/, the decode caches (lib/kv_cache.py) and what they build on.
Importing the package imports every method file, so the registry is full."""

import lib.codecs  # noqa: F401
import lib.selectors  # noqa: F401
