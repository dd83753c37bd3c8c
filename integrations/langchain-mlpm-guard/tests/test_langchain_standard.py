"""LangChain's standard chat-model suites (``langchain-tests``) on ``ChatMLPMGuard``.

Tool calling and structured output are declared unsupported (the tests for them skip); every
other standard test runs on the embedded backbone with the small fixture prototypes.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_mlpm_guard import ChatMLPMGuard  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from mlpm_guard import GenerationConfig, Guard  # noqa: E402

_GUARDS: dict[int, Guard] = {}
# The standard prompts are benign but a 40-prompt fit is unsure about some ("Hello", "What's 2+2?"):
# every route but refusal answers, so the suites test the chat model and not the fixture's verdicts.
ANSWER_ALL = {"safe_route": "pass", "controversial_route": "pass", "unsafe_route": "pass", "allow_pass_for_unsafe": True}


class _Setup:
    @pytest.fixture(autouse=True)
    def _guard(self, backbone, small_prototypes):
        _GUARDS.setdefault(0, Guard(backbone, small_prototypes, policy=ANSWER_ALL,
                                    generation=GenerationConfig(max_new_tokens=8)))

    @property
    def chat_model_class(self) -> type[ChatMLPMGuard]:
        return ChatMLPMGuard

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"guard": _GUARDS.get(0), "max_new_tokens": 8}

    @property
    def has_tool_calling(self) -> bool:
        return False  # bind_tools raises and names the middleware / with_guard instead

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True


class TestChatMLPMGuardUnit(_Setup, ChatModelUnitTests):
    pass


class TestChatMLPMGuardIntegration(_Setup, ChatModelIntegrationTests):
    pass


def test_unsupported_features_say_what_to_use(small_prototypes, backbone):
    model = ChatMLPMGuard(guard=Guard(backbone, small_prototypes))
    with pytest.raises(NotImplementedError, match="MLPMGuardMiddleware"):
        model.bind_tools([])
    with pytest.raises(NotImplementedError, match="with_guard"):
        model.with_structured_output(dict)
