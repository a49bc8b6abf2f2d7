// Ctrl/Cmd+Enter in the SQL editor runs the query.
document.addEventListener("keydown", function (e) {
  if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && e.target && e.target.id === "sql-text") {
    var btn = document.getElementById("sql-run");
    if (btn) { e.preventDefault(); btn.click(); }
  }
});
