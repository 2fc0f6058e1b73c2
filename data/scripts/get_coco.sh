#!/usr/bin/env bash
# Downloads COCO 2017 (images, instances + captions, COCO-Stuff maps) into ../datasets/coco, the layout
# data/coco.yaml expects. About 27 GB. Usage: bash data/scripts/get_coco.sh [DIR]
set -euo pipefail
DIR="${1:-$(dirname "$0")/../../../datasets/coco}"
mkdir -p "$DIR/images" && cd "$DIR"
get() { [ -f "$(basename "$1")" ] || curl -L --fail -O "$1"; }
get http://images.cocodataset.org/annotations/annotations_trainval2017.zip
get http://images.cocodataset.org/annotations/stuff_annotations_trainval2017.zip
get http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip
get http://images.cocodataset.org/zips/train2017.zip
get http://images.cocodataset.org/zips/val2017.zip
unzip -qn annotations_trainval2017.zip
unzip -qn stuff_annotations_trainval2017.zip          # annotations/stuff_{train,val}2017.json (categories)
unzip -qn stuffthingmaps_trainval2017.zip -d stuffthingmaps_trainval2017
(cd images && unzip -qn ../train2017.zip && unzip -qn ../val2017.zip)
echo "COCO 2017 ready in $DIR"
