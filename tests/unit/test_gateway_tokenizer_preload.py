"""The gateway loads its tokenizer as it starts (from --tokenizer-path), so the first
generation does not wait seconds for it; a failed preload is retried on use."""

from __future__ import annotations

import pytest

from services.common.errors import Unavailable
from services.gateway.generation.pool import InferencePool


async def test_preload_loads_the_tokenizer_before_any_request(tiny_model_dir) -> None:
    pool = InferencePool([], str(tiny_model_dir))
    try:
        assert pool._tokenizer is None
        await pool.preload_tokenizer()
        assert pool._tokenizer is not None
        assert await pool.tokenizer() is pool._tokenizer
    finally:
        await pool.close()


async def test_preload_without_a_path_does_nothing_and_a_bad_path_fails_on_use(tmp_path) -> None:
    bare = InferencePool([])
    try:
        await bare.preload_tokenizer()
        assert bare._tokenizer is None
    finally:
        await bare.close()
    bad = InferencePool([], str(tmp_path / "missing"))
    try:
        await bad.preload_tokenizer()  # logged, not raised
        assert bad._tokenizer is None
        with pytest.raises(Unavailable):
            await bad.tokenizer()
    finally:
        await bad.close()
