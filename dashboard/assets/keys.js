// Ctrl/Cmd+Enter in the SQL editor runs the query.
document.addEventListener("keydown", function (e) {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && e.target && e.target.id === "sql-text") {
    var btn = document.getElementById("sql-run");
    if (btn) { e.preventDefault(); btn.click(); }
  }
});

// Enter on a focused cell of the Runs grid's name column opens the run page, as a click on its link
// does (keyboard users reach the grid cell by cell with Tab and the arrow keys; the link inside a cell
// is not in the tab order). Capture phase: the grid handles Enter itself before it would bubble.
document.addEventListener("keydown", function (e) {
  if (e.key !== "Enter" || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) { return; }
  var cell = e.target && e.target.closest && e.target.closest(".ag-cell[col-id='name']");
  var link = cell && cell.querySelector("a.run-link");
  if (link) { e.preventDefault(); e.stopPropagation(); link.click(); }
}, true);
