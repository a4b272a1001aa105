"""Runs gcp-storage-emulator in memory on 127.0.0.1: ``python gcs_emulator.py PORT``.

Two gaps of the emulator against real GCS are filled here, nothing else is changed:
- its object listing ignores ``startOffset``/``endOffset``, which TensorStore's gcs
  driver sends for every ranged list and range delete: it would list (and so delete) a
  whole common prefix;
- its media download omits the ``x-goog-generation`` header GCS sends, from which
  TensorStore learns the object's generation, and ignores ``ifGenerationNotMatch``
  (TensorStore's re-read of a cached object; without both, "Malformed
  StorageGeneration").
"""

import logging
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


def _ls_in_range(request, response, storage, *args, **kwargs):
    start = (request.query.get("startOffset") or [""])[0]
    end = (request.query.get("endOffset") or [None])[0]
    send = response.json

    def json(body):
        body["items"] = [item for item in body.get("items") or ()
                         if item["name"] >= start and (end is None or item["name"] < end)]
        send(body)

    response.json = json
    return objects.ls(request, response, storage, *args, **kwargs)


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 (a missing object: download answers 404 itself)
        return objects.download(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    response["x-goog-generation"] = generation
    if (request.query.get("ifGenerationNotMatch") or [None])[0] == generation:
        response.status = 304  # unchanged since the reader's cached copy, as GCS answers
        return None
    return objects.download(request, response, storage, *args, **kwargs)


def main(port: int) -> None:
    replace = {objects.ls: _ls_in_range, objects.download: _download_with_generation}
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            handlers[method] = replace.get(handler, handler)
    logging.disable(logging.WARNING)  # a request log line per object otherwise
    server.create_server("127.0.0.1", port, in_memory=True).run()  # until terminated


if __name__ == "__main__":
    main(int(sys.argv[1]))
