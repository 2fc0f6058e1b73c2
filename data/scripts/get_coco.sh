#!/usr/bin/env bash
# Downloads COCO 2017 (images, instances + captions, COCO-Stuff maps, panoptic) into ../datasets/coco, the layout
# data/coco.yaml expects. About 29 GB. Usage: bash data/scripts/get_coco.sh [DIR]
set -euo pipefail
DIR="${1:-$(dirname "$0")/../../../datasets/coco}"
mkdir -p "$DIR/images" && cd "$DIR"
get() { [ -f "$(basename "$1")" ] || curl -L --fail -O "$1"; }
get http://images.cocodataset.org/annotations/annotations_trainval2017.zip
get http://images.cocodataset.org/annotations/stuff_annotations_trainval2017.zip
get http://images.cocodataset.org/annotations/panoptic_annotations_trainval2017.zip
get http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip
get http://images.cocodataset.org/zips/train2017.zip
get http://images.cocodataset.org/zips/val2017.zip
unzip -qn annotations_trainval2017.zip
unzip -qn stuff_annotations_trainval2017.zip          # annotations/stuff_{train,val}2017.json (categories)
unzip -qn stuffthingmaps_trainval2017.zip -d stuffthingmaps_trainval2017
# annotations/panoptic_{train,val}2017.json, with each split's PNGs in an inner zip beside its JSON
unzip -qn panoptic_annotations_trainval2017.zip
for s in train2017 val2017; do (cd annotations && unzip -qn "panoptic_$s.zip"); done  # -> annotations/panoptic_$s/
(cd images && unzip -qn ../train2017.zip && unzip -qn ../val2017.zip)
echo "COCO 2017 ready in $DIR"
