"""Our GGUF reader returns exactly what the `gguf` package's reader does, much faster."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.gguf_metadata import open_reader


def test_same_metadata_and_tensors_as_gguf_reader(default_gguf):
    import gguf

    ours = open_reader(default_gguf)
    ref = gguf.GGUFReader(str(default_gguf))
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


@pytest.mark.parametrize("cut", [10, 100_000, 1_500_000])
def test_truncated_inside_header_or_metadata(tmp_path, default_gguf, cut):
    with open(default_gguf, "rb") as f:
        head = f.read(cut)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(head)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        open_reader(bad)
