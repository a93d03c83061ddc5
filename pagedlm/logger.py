import logging
import os


def init_logger() -> logging.Logger:
    """pagedlm's logger: INFO to stderr by default, ``PAGEDLM_LOGGING_LEVEL`` to change it."""
    logger = logging.getLogger("pagedlm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("PAGEDLM_LOGGING_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger
