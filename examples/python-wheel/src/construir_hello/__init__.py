"""What the example's wheel holds: a function that uses its dependency."""
import six


def greeting():
    return "hello from a wheel, six " + six.__version__ + (" on Python 3" if six.PY3 else "")
