// Render the math that pymdownx.arithmatex (generic mode) leaves as \( .. \) and \[ .. \].
// Material's document$ fires on every page load, including instant navigation.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
