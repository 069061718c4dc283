#!/usr/bin/env bash
# Fill .carry/jre and .carry/torchserve (git-ignored) for a real TorchServe on the GPU machine, which has no Java:
# a Java runtime made here with jlink (the modules TorchServe 0.12's frontend needs; ~50 MB, ~30 MB as tar.xz) and
# the torchserve / torch-model-archiver wheels (Python 3.12). Used by tests/gpu/run_h200.sh stages ts-java, ts-wheel
# and ts-real. Run after tests/gpu/prepare_carry.sh (which empties .carry/).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .carry/jre .carry/torchserve /tmp/tandem-jre && mkdir -p .carry/jre .carry/torchserve
jlink --add-modules java.base,java.logging,java.management,java.naming,java.net.http,java.sql,java.xml,java.desktop,jdk.crypto.ec,jdk.unsupported,jdk.management \
    --strip-debug --no-header-files --no-man-pages --compress=2 --output /tmp/tandem-jre
tar -C /tmp -cJf .carry/jre/jre.tar.xz tandem-jre
sha256sum .carry/jre/jre.tar.xz | cut -d' ' -f1 > .carry/jre/jre.tar.xz.sha256
rm -rf /tmp/tandem-jre
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
    --platform manylinux_2_17_x86_64 -d .carry/torchserve torchserve==0.12.0 torch-model-archiver==0.12.0
du -sh .carry/jre .carry/torchserve
