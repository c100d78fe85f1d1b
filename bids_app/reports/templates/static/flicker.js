document.querySelectorAll("figure.flicker").forEach(function (figure) {
  var button = figure.querySelector("button");
  button.addEventListener("click", function () {
    var showsTemplate = figure.classList.toggle("show-template");
    button.setAttribute("aria-pressed", showsTemplate ? "true" : "false");
    button.textContent = showsTemplate ? "Show the normalised T1w" : "Show the template";
  });
});
