"""Image files: the pixel limit and header probing (size and format without decoding).

The one place kpnet reads image headers: the pipeline, the DLC loader, ``kpnet data check``
and ``kpnet predict`` all probe through here, and refuse an image whose header declares
more than the pixel limit before anything decodes it.
"""

from __future__ import annotations

#: Largest image (height x width) kpnet decodes by default: Pillow's decompression-bomb
#: limit. Recipes override it with ``data.max_pixels``.
MAX_PIXELS = 178_956_970
