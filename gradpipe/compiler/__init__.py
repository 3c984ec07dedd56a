"""The compiler: AST -> IR graph (networkx) -> checked, optimised IR."""
