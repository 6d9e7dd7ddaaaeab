"""A small STAC API on 127.0.0.1 for tests: the landing page, conformance, collections and item search (GET and
POST; collections, bbox, intersects, datetime, the query extension's ``eo:cloud_cover``, pages of ``limit`` items
linked by ``next``), beside the files its items point at, served with HTTP range requests as an object store serves
COGs.
Every request is logged; ``fail_once`` paths answer 503 the first time (a busy object store)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np
import rasterio

BANDS = {"blue": 1, "green": 2, "red": 3, "nir": 4}  # asset key (Earth Search's) -> band of the synthetic file
BLOB_HOST = ".blob.core.windows.net"  # Azure Blob Storage hosts, served here as a proxy (the Planetary Computer)
SAS_PATH = "/api/sas/v1/token/"
SIGNATURE = "geowm-test-signature"
CORE = "https://api.stacspec.org/v1.0.0/core"
ITEM_SEARCH = "https://api.stacspec.org/v1.0.0/item-search"
QUERY = "https://api.stacspec.org/v1.0.0/item-search#query"
COLLECTIONS = "https://api.stacspec.org/v1.0.0/collections"


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class StacApi:
    def __init__(self, files: Path, items: list[dict], page_size: int = 3, query: bool = True,
                 search: bool = True, latency_s: float = 0.0):
        self.files, self.items, self.page_size = Path(files), items, page_size
        self.latency_s = latency_s  # added to every answer: a server across the internet, not on loopback
        self.conforms = [CORE, COLLECTIONS] + ([ITEM_SEARCH] + ([QUERY] if query else []) if search else [])
        self.log: list[tuple[str, str, dict | None]] = []
        self.fail_once: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StacApi:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_url(self, rel: str) -> str:
        return f"{self.url}/files/{rel}"

    def searches(self) -> list[dict]:
        return [body for method, path, body in self.log if path.startswith("/search")]

    # ------------------------------------------------------------------ the API

    def _landing(self) -> dict:
        u = self.url
        links = [{"rel": "self", "href": f"{u}/", "type": "application/json"},
                 {"rel": "root", "href": f"{u}/", "type": "application/json"},
                 {"rel": "conformance", "href": f"{u}/conformance", "type": "application/json"},
                 {"rel": "data", "href": f"{u}/collections", "type": "application/json"}]
        if ITEM_SEARCH in self.conforms:
            links += [{"rel": "search", "href": f"{u}/search", "type": "application/geo+json", "method": m}
                      for m in ("GET", "POST")]
        return {"type": "Catalog", "id": "test-api", "stac_version": "1.0.0", "description": "geowm test API",
                "conformsTo": self.conforms, "links": links}

    def _collection(self, cid: str) -> dict:
        u = self.url
        return {"type": "Collection", "id": cid, "stac_version": "1.0.0", "description": cid, "license": "proprietary",
                "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
                "links": [{"rel": "self", "href": f"{u}/collections/{cid}"}, {"rel": "root", "href": f"{u}/"}]}

    def _search(self, params: dict, post: bool) -> dict:
        cols = params.get("collections")
        cols = cols.split(",") if isinstance(cols, str) else cols
        bbox = params.get("bbox")
        bbox = [float(v) for v in bbox.split(",")] if isinstance(bbox, str) else bbox
        dt = params.get("datetime")
        query = params.get("query")
        query = json.loads(query) if isinstance(query, str) else query
        found = []
        for it in sorted(self.items, key=lambda i: (i["properties"]["datetime"], i["id"])):
            if cols and it.get("collection") not in cols:
                continue
            if bbox:
                w, s, e, n = it["bbox"]
                if w > bbox[2] or e < bbox[0] or s > bbox[3] or n < bbox[1]:
                    continue
            if dt:
                t = _when(it["properties"]["datetime"])
                lo, _, hi = dt.partition("/") if "/" in dt else (dt, "", dt)
                if lo not in ("", "..") and t < _when(lo) or hi not in ("", "..") and t > _when(hi):
                    continue
            if params.get("intersects"):
                from shapely.geometry import shape

                if not shape(params["intersects"]).intersects(shape(it["geometry"])):
                    continue
            cover = (query or {}).get("eo:cloud_cover", {})
            if "lte" in cover and it["properties"].get("eo:cloud_cover", 0) > cover["lte"]:
                continue
            found.append(it)
        limit = int(params.get("limit") or self.page_size)
        limit = min(limit, self.page_size)
        start = int(params.get("token") or 0)
        page = found[start:start + limit]
        links = []
        if start + limit < len(found) and post:  # the next page as STAC API - Item Search links it
            links.append({"rel": "next", "href": f"{self.url}/search", "method": "POST", "merge": True,
                          "body": {"token": start + limit}, "type": "application/geo+json"})
        elif start + limit < len(found):
            nxt = {k: v for k, v in params.items() if k != "token"}
            links.append({"rel": "next", "href": f"{self.url}/search?{urlencode({**nxt, 'token': start + limit})}",
                          "method": "GET", "type": "application/geo+json"})
        return {"type": "FeatureCollection", "features": page, "links": links,
                "numberMatched": len(found), "numberReturned": len(page)}

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _json(self, obj: dict, code: int = 200) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self, method: str, body: dict | None) -> None:
                url = urlparse(self.path)
                api.log.append((method, self.path, body))
                if api.latency_s:
                    time.sleep(api.latency_s)
                if self.path in api.fail_once:
                    api.fail_once.discard(self.path)
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if (url.hostname or "").endswith(BLOB_HOST):  # as the HTTP proxy GDAL is told to use (tests)
                    if f"sig={SIGNATURE}" not in url.query:
                        return self._json({"code": "AuthenticationFailed", "description": "no SAS token"}, 403)
                    return self._file(url.path.lstrip("/").partition("/")[2], method == "HEAD")
                if url.path.startswith(SAS_PATH):  # /api/sas/v1/token/<account>/<container>
                    return self._json({"msft:expiry": "2099-01-01T00:00:00Z",
                                       "token": f"st=2026-01-01&se=2099-01-01&sp=rl&sr=c&sig={SIGNATURE}"})
                if url.path == "/_requests":  # how many requests came before this one (another process asks)
                    return self._json({"requests": len(api.log) - 1})
                if url.path.startswith("/files/"):
                    return self._file(url.path[len("/files/"):], method == "HEAD")
                if url.path in ("", "/"):
                    return self._json(api._landing())
                if url.path == "/conformance":
                    return self._json({"conformsTo": api.conforms})
                if url.path == "/collections":
                    cids = sorted({it.get("collection") for it in api.items})
                    return self._json({"collections": [api._collection(c) for c in cids], "links": []})
                if url.path.startswith("/collections/"):
                    return self._json(api._collection(url.path.split("/")[2]))
                if url.path == "/search" and ITEM_SEARCH in api.conforms:
                    params = body if body is not None else {k: v[0] for k, v in parse_qs(url.query).items()}
                    return self._json(api._search(params, body is not None))
                self._json({"code": "NotFound", "description": self.path}, 404)

            def _file(self, rel: str, head: bool) -> None:
                path = (api.files / rel).resolve()
                if not path.is_file() or api.files.resolve() not in path.parents:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                rng = self.headers.get("Range")
                a, b = 0, size - 1
                if rng and rng.startswith("bytes="):
                    lo, _, hi = rng[6:].partition("-")
                    a, b = int(lo), min(int(hi) if hi else size - 1, size - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                else:
                    self.send_response(200)
                with path.open("rb") as f:  # only the bytes asked for, as an object store serves a range
                    f.seek(a)
                    chunk = f.read(b - a + 1)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "image/tiff")
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if not head:
                    self.wfile.write(chunk)

            def do_GET(self):  # noqa: N802
                self._route("GET", None)

            def do_HEAD(self):  # noqa: N802
                self._route("HEAD", None)

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                self._route("POST", json.loads(self.rfile.read(n) or b"{}"))

        return Handler


def _cog(path: Path, data: np.ndarray, profile: dict, driver: str = "COG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    prof = {**profile, "driver": driver, "count": data.shape[0], "dtype": data.dtype.name}
    for key in ("blockxsize", "blockysize", "tiled", "interleave", "compress", "photometric"):
        prof.pop(key, None)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)


def earth_search_items(region: Path, files: Path, url_of, n: int, collection: str,
                       since: str = "S2SYN_20210601") -> list[dict]:
    """``n`` items of a synthetic region (``geowm synth``) from ``since`` on (summer: clear, partly and fully
    cloudy scenes), in ``collection``, as Earth Search publishes Sentinel-2 L2A: one COG per band (asset keys
    blue, green, red, nir; eo:bands named so), ``scl`` with no eo:bands, and two assets that are not the
    measurements: the 8-bit true-colour ``visual`` COG (eo:bands red, green, blue) and a JPEG 2000 copy of the red
    band with no media type (``B04-jp2``), an ``overview`` COG of no named band, all of other values, and a
    thumbnail."""
    docs = [d for d in sorted((region / "stac").rglob("S2SYN_*.json"), key=lambda p: p.stem)
            if d.stem >= since][:n]
    items = []
    for doc in docs:
        src = json.loads(doc.read_text())
        iid = src["id"]
        refl = (doc.parent / src["assets"]["reflectance"]["href"]).resolve()
        scl = (doc.parent / src["assets"]["SCL"]["href"]).resolve()
        with rasterio.open(refl) as r:
            data, profile = r.read(), r.profile
        assets = {}
        for key, b in BANDS.items():
            _cog(files / iid / f"{key}.tif", data[b - 1:b], profile)
            assets[key] = {"href": url_of(f"{iid}/{key}.tif"), "type": "image/tiff; application=geotiff; "
                           "profile=cloud-optimized", "roles": ["data", "reflectance"],
                           "eo:bands": [{"name": key, "common_name": key}],
                           "raster:bands": [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": 0}]}
        shutil.copy(scl, files / iid / "SCL.tif")
        assets["scl"] = {"href": url_of(f"{iid}/SCL.tif"), "roles": ["data"],
                         "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                         "raster:bands": [{"nodata": 0, "data_type": "uint8"}]}
        _cog(files / iid / "TCI.tif", np.full((3, *data.shape[1:]), 255, np.uint8), {**profile, "nodata": 0})
        assets["visual"] = {"href": url_of(f"{iid}/TCI.tif"), "roles": ["visual"],
                            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                            "eo:bands": [{"name": n, "common_name": n} for n in ("red", "green", "blue")]}
        _cog(files / iid / "B04.jp2", np.full((1, *data.shape[1:]), 7, np.uint16), profile, "JP2OpenJPEG")
        assets["B04-jp2"] = {"href": url_of(f"{iid}/B04.jp2"), "roles": ["data"],
                             "eo:bands": [{"name": "red", "common_name": "red"}]}
        _cog(files / iid / "quicklook.tif", np.full((1, *data.shape[1:]), 9, np.uint8), {**profile, "nodata": 0})
        assets["overview"] = {"href": url_of(f"{iid}/quicklook.tif"), "roles": ["overview"],
                              "type": "image/tiff; application=geotiff; profile=cloud-optimized"}
        assets["thumbnail"] = {"href": url_of(f"{iid}/thumb.jpg"), "type": "image/jpeg", "roles": ["thumbnail"]}
        items.append({"type": "Feature", "stac_version": "1.0.0", "id": iid, "collection": collection,
                      "geometry": src["geometry"], "bbox": src["bbox"], "properties": {
                          "datetime": src["properties"]["datetime"], "platform": "sentinel-2a",
                          "eo:cloud_cover": src["properties"]["eo:cloud_cover"]},
                      "assets": assets, "links": [], "stac_extensions": []})
    return items


def main() -> None:
    """``python -m tests.stac_api FILES ITEMS.json [LATENCY_S]``: serve in a process of its own (a benchmark's
    server must not share the GIL with the ingest it measures); prints the URL, serves until killed. The items'
    hrefs may hold ``{base}``, replaced by the server's URL."""
    import sys

    files, items = Path(sys.argv[1]), Path(sys.argv[2])
    api = StacApi(files, [], page_size=10, latency_s=float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    api.items = json.loads(items.read_text().replace("{base}", api.url))
    print(api.url, flush=True)
    with api:
        threading.Event().wait()


if __name__ == "__main__":
    main()
