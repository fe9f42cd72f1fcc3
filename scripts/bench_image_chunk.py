"""Images per image-encoder run (models/runtime.IMAGE_CHUNK): CPU per image of EncoderRuntime.encode_images.

    python scripts/bench_image_chunk.py [--images 64] [--rounds 5] [--out reports/bench-image-chunk.json]

The WikiMEL release's photos (decoded as /v1/link and PUT /v1/entities decode them), --images of them per call, as
an index build, a job batch or an entity update call hands them over. Each chunk size (1, 2, 4, 8, 16 and the
whole call) on one and on two ONNX Runtime threads, alternating within each round; the median over rounds of CPU
ms and wall ms per image, and each one's CPU ratio against the whole call in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    from models import runtime as rt_module
    from models.runtime import EncoderRuntime
    from service.offline.bench import machine_info
    from service.pipeline.decode import decode_image
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("reports/bench-image-chunk.json"))
    args = ap.parse_args()
    machine = machine_info()
    settings = Settings()
    files = sorted((settings.data_dir / "WikiMEL" / "images").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no image under {settings.data_dir / 'WikiMEL' / 'images'}")
    photos = [decode_image(f.read_bytes(), settings.limits, target_size=224) for f in files]
    images = [photos[i % len(photos)] for i in range(args.images)]
    chunks = [1, 2, 4, 8, 16, args.images]
    report: dict = {"machine": machine, "images_per_call": args.images, "photos": len(photos), "rounds": args.rounds,
                    "served_chunk": rt_module.IMAGE_CHUNK, "threads": {}}
    served = rt_module.IMAGE_CHUNK
    try:
        for threads in (1, 2):
            runtime = EncoderRuntime(settings.encoder.onnx_dir, device="cpu", threads=threads)
            runtime.encode_images(images[:4])  # warm
            cpu: dict[int, list[float]] = {c: [] for c in chunks}
            wall: dict[int, list[float]] = {c: [] for c in chunks}
            for _ in range(args.rounds):
                for chunk in chunks:
                    rt_module.IMAGE_CHUNK = chunk
                    c0, w0 = time.process_time(), time.perf_counter()
                    runtime.encode_images(images)
                    cpu[chunk].append((time.process_time() - c0) * 1e3 / len(images))
                    wall[chunk].append((time.perf_counter() - w0) * 1e3 / len(images))
            whole = statistics.median(cpu[args.images])
            report["threads"][str(threads)] = {
                str(c): {"cpu_ms_per_image": round(statistics.median(cpu[c]), 2),
                         "wall_ms_per_image": round(statistics.median(wall[c]), 2),
                         "cpu_ratio_to_whole_call": round(statistics.median(cpu[c]) / whole, 3)}
                for c in chunks}
    finally:
        rt_module.IMAGE_CHUNK = served
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["threads"], indent=1))


if __name__ == "__main__":
    main()
