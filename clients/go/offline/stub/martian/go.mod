module github.com/google/martian
