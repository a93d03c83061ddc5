import logging
import os


def init_logger() -> logging.Logger:
    """pagedlm's logger: INFO to stderr by default, ``PAGEDLM_LOGGING_LEVEL`` to change it (a name
    ``logging`` knows, any case; unset or empty: INFO).

    Raises:
        ValueError: ``PAGEDLM_LOGGING_LEVEL`` is no level name (found by a hunt: logging's "Unknown
            level" named neither the variable nor the levels).
    """
    logger = logging.getLogger("pagedlm")
    if not logger.handlers:
        level = (os.environ.get("PAGEDLM_LOGGING_LEVEL") or "INFO").upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"PAGEDLM_LOGGING_LEVEL={os.environ['PAGEDLM_LOGGING_LEVEL']!r}: use DEBUG, INFO, "
                             "WARNING, ERROR or CRITICAL")
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return logger
