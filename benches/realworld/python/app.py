"""A small app on its wheels."""
import idna
import six

print("six", six.__version__, "idna", idna.encode("bücher.example").decode())
