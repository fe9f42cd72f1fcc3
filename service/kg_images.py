"""The KG's own entity images, for GET /v1/entities/{id}/image (the web page shows them beside each candidate).

The index records only whether an entity has an image (`has_image`); the files are those of the KG the index was
built from (EL_INDEX__KG under EL_DATA_DIR: the MEL image folders, or the paths a JSONL KG names). The KG is read
once, on the first image request (about 1 s for the 40,942 MEL entities), and each image is decoded by the rules of
uploaded images (service/pipeline/decode.py: byte and pixel caps, allowed formats) and served as a JPEG of at most
THUMB_SIDE pixels a side, so a huge or odd file in the KG never reaches a browser as is.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from service.errors import ELError, EntityImageNotFound
from service.pipeline.decode import decode_image
from service.settings import Settings

logger = logging.getLogger(__name__)

THUMB_SIDE = 320
CACHE_ITEMS = 256  # thumbnails kept in memory (about 15-30 KB each)


class KGImages:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._paths: dict[str, Path] | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def _image_paths(self) -> dict[str, Path]:
        with self._lock:
            if self._paths is None:
                from kg_index.readers import read_kg

                kg = read_kg(self.settings.index.kg, self.settings.data_dir)
                self._paths = {e.id: e.image for e in kg if e.image is not None}
                logger.info("KG images: %d entities with an image", len(self._paths))
            return self._paths

    def thumbnail(self, entity_id: str) -> bytes:
        """JPEG bytes of the entity's KG image; EntityImageNotFound when the KG has none it may serve."""
        with self._lock:
            if (hit := self._cache.get(entity_id)) is not None:
                self._cache.move_to_end(entity_id)
                return hit
        path = self._image_paths().get(entity_id)
        if path is None:
            raise EntityImageNotFound(f"entity {entity_id!r} has no image in the KG")
        lim = self.settings.limits
        try:
            with path.open("rb") as f:
                data = f.read(lim.max_image_bytes + 1)
            img = decode_image(data, lim, target_size=THUMB_SIDE)
        except OSError:
            logger.warning("KG image of %s is unreadable: %s", entity_id, path)
            raise EntityImageNotFound(f"the KG image of entity {entity_id!r} cannot be read") from None
        except ELError as exc:  # too large, unsupported format, corrupt: the upload rules hold for KG files too
            raise EntityImageNotFound(f"the KG image of entity {entity_id!r} cannot be served ({exc.code})") from None
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out = buf.getvalue()
        with self._lock:
            self._cache[entity_id] = out
            while len(self._cache) > CACHE_ITEMS:
                self._cache.popitem(last=False)
        return out
