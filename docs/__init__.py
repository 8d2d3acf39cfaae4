"""The documentation site (MkDocs): its pages, and the generator of its reference pages."""
