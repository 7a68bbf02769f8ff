"""Log formats for `loxi-mirror start --log-format`: text for people, json
(one object per line) for journald/Kubernetes log collectors."""

import json
import logging
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s loxi-mirror %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"[, "exception"]} per record."""

    def format(self, record):
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(fmt: str, verbose: bool, stream) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
