"""Shared by every test file: the model tests run their tiny models on one thread.

Tiny models gain nothing from a second thread, and on a shared 2-core machine a
second thread makes them slower and their timing erratic."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
