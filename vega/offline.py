"""Write an HTML template for `dvc plots show --html-template` with Vega, Vega-Lite and Vega-Embed inlined.

DVC's own page loads them from a CDN, so offline it shows only the PNGs. Usage (what `make plots` runs):
    python vega/offline.py FOLDER    # FOLDER holds the npm tarballs of vega@5, vega-lite@5, vega-embed@6
Writes FOLDER/offline.html; the template leaves out DVC's {scripts} placeholder, so no CDN tag is added.
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

LIBRARIES = ("vega", "vega-lite", "vega-embed")  # load order: each needs the one before


def script(folder: Path, name: str) -> str:
    [tarball] = [p for p in folder.glob(f"{name}-[0-9]*.tgz")]
    with tarfile.open(tarball) as tar:
        code = tar.extractfile(f"package/build/{name}.min.js").read().decode()
    return "<script>" + code.replace("</script", "<\\/script") + "</script>"


def main(folder: Path) -> None:
    scripts = "\n".join(script(folder, name) for name in LIBRARIES)
    page = ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n<title>accelbench: dvc plots</title>\n"
            f"{scripts}\n<style>body{{font-family:sans-serif}} table{{border-spacing:15px}}</style>\n"
            "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")
    (folder / "offline.html").write_text(page)
    print(f"{folder / 'offline.html'}: {len(page) // 1024} KiB, {', '.join(LIBRARIES)} inlined")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
