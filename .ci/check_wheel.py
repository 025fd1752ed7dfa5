"""Fails unless a wheel holds the package and its metadata only (no tests, examples or benchmarks)."""

import sys
import zipfile

wheel = sys.argv[1]
names = zipfile.ZipFile(wheel).namelist()
stray = [n for n in names if not (n.startswith("keras_gradops/") or n.split("/")[0].endswith(".dist-info"))]
if stray or "keras_gradops/__init__.py" not in names:
    sys.exit(f"{wheel}: files outside the package: {stray}" if stray else f"{wheel}: no keras_gradops package")
licenses = [n for n in names if n.split("/")[-1] == "LICENSE"]
if not licenses:
    sys.exit(f"{wheel}: no LICENSE file")
print(f"{wheel.split('/')[-1]}: {len(names)} files, all keras_gradops/ or metadata (licence: {licenses[0]})")
