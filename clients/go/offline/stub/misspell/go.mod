module github.com/client9/misspell
