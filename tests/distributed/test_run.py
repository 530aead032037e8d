"""The distributed run's own rules (slimtune.distributed.run): what the ranks other than 0 keep to themselves."""

from __future__ import annotations

import logging
import warnings

from slimtune.distributed.run import _warnings_of_rank_0


def test_only_rank_0_warns_and_every_rank_reports_errors(caplog):
    logger = logging.getLogger("slimtune.train")
    for is_main in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="slimtune"), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with _warnings_of_rank_0(is_main):
                logger.warning("a logged warning")
                logger.error("an error")
                warnings.warn("a Python warning", UserWarning, stacklevel=1)
            assert logging.getLogger("slimtune").level == logging.WARNING  # (caplog's level, restored)
        said = [record.getMessage() for record in caplog.records]
        assert said == (["a logged warning", "an error"] if is_main else ["an error"])
        assert [str(w.message) for w in seen] == (["a Python warning"] if is_main else [])
