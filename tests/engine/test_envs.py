from clipengine import envs


def test_cache_dir_follows_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPENGINE_CACHE_DIR", str(tmp_path / "c"))
    assert envs.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CLIPENGINE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert envs.cache_dir() == tmp_path / "xdg" / "clipengine"


def test_offline_flags(monkeypatch):
    for name in ("CLIPENGINE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert not envs.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert envs.offline()


def test_num_threads(monkeypatch):
    monkeypatch.setenv("CLIPENGINE_NUM_THREADS", "3")
    assert envs.num_threads() == 3
    monkeypatch.delenv("CLIPENGINE_NUM_THREADS")
    assert envs.num_threads() >= 1
