"""Small helpers the rest of the library shares; they import nothing else of the library
(besides each other), so any module may use them without an import cycle."""
