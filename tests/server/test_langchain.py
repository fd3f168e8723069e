"""LangChain's ChatOpenAI works unchanged: invoke and stream give the same text at temperature 0."""

from __future__ import annotations


def test_chat_openai_invoke_and_stream(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="whatever", temperature=0, max_tokens=24)
    question = "What is the capital of France?"
    invoked = llm.invoke(question).content
    streamed = "".join(chunk.content for chunk in llm.stream(question))
    assert invoked == streamed and "Paris" in invoked
