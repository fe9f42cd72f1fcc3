#!/usr/bin/env bash
# Fetch the MEL benchmark files into a folder (default data/mel) for machines without a local mirror.
# The project never redistributes the data. Either point EL_DATA_URL at a .tar.gz of the folder layout
# below (e.g. your organisation's mirror), or assemble it from the original public releases:
#   WikiMEL/       Wikidata-MEL.MELBench.json, Wikidata-MEL.with_imgPath.BlueStragglers.json,
#                  qid2ne.json, ne2qid.json, qid2abs.json, splits.json, images/   (MELBench: seukgcode/MELBench,
#                  and its authors' BlueStragglers MultimodalDatasets copy; KB files from the MEL-GHMFC release)
#   RichpediaMEL/  train.json, qid2ne.json, ne2qid.json, qid2abs.json, qid2abs_long.json, img_list.json,
#                  qids_ordered.json, images/  (same sources)
#   WikiDiverse/   WikiDiverse.json, splits.json  (the MIMIC-cleaned copy shipped with the KGMEL release)
# Then: export EL_DATA_DIR=$PWD/data/mel (the Makefile does this when data/mel exists).
set -euo pipefail
dest=${1:-data/mel}
if [ -d "$dest/WikiMEL" ]; then
  echo "data already present in $dest"; exit 0
fi
if [ -z "${EL_DATA_URL:-}" ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  echo "EL_DATA_URL is not set: nothing downloaded." >&2
  exit 1
fi
mkdir -p "$dest"
curl -fL --retry 3 "$EL_DATA_URL" | tar -xz -C "$dest" --strip-components="${EL_DATA_STRIP:-0}"
test -d "$dest/WikiMEL" || { echo "archive did not contain WikiMEL/ at its top level (set EL_DATA_STRIP)" >&2; exit 1; }
echo "data ready in $dest; export EL_DATA_DIR=$(cd "$dest" && pwd)"
