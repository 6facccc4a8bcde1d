"""Tools for the tool-loop sampler: the Tool protocol, search (BM25, dense, HTTP client), server, calculator."""

from modalities.text_agent.tools.base import Tool, ToolError
from modalities.text_agent.tools.calculator import Calculator, evaluate_expression
from modalities.text_agent.tools.corpus import Document, JsonlCorpus, Retriever, SearchHit, SearchTool, format_hits
from modalities.text_agent.tools.retriever_server import RetrieverServer, make_server
from modalities.text_agent.tools.search import BM25Search, DenseSearch, RetrieverClient

__all__ = [
    "BM25Search",
    "Calculator",
    "DenseSearch",
    "Document",
    "JsonlCorpus",
    "Retriever",
    "RetrieverClient",
    "RetrieverServer",
    "SearchHit",
    "SearchTool",
    "Tool",
    "ToolError",
    "evaluate_expression",
    "format_hits",
    "make_server",
]
