import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from tests.calib.tiny_diffusion import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sampler(tiny_sd_dir):
    from vitqc.calib.diffusion import load_diffusion

    return load_diffusion(str(tiny_sd_dir), device="cpu")


@pytest.fixture(scope="session")
def text_sampler(tmp_path_factory):
    """The tiny pipeline with its text conditioning strengthened (see build_tiny_sd), for prompt learning."""
    from tests.calib.tiny_diffusion import build_tiny_sd
    from vitqc.calib.diffusion import load_diffusion

    return load_diffusion(str(build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_text"), text_driven=True)), device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops; on a shared 2-core machine two OpenMP threads spin against each other
    (40x slower measured), so they run single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
