// Custom cell renderers for dash-ag-grid (it reads window.dashAgGridComponentFunctions).
var dagcomponentfuncs = (window.dashAgGridComponentFunctions = window.dashAgGridComponentFunctions || {});

// The Runs grid's name column: a link to the run page. A click follows the link without also
// toggling the row's selection (the grid selects on row click).
dagcomponentfuncs.RunLink = function (props) {
  var href = props.data && props.data.run_href;
  if (!href) { return props.value; }
  return React.createElement("a", {
    href: href, className: "run-link", title: "Open the run page",
    // a native listener: it runs before the grid's own (React's onClick would run after it)
    ref: function (el) {
      if (el && !el.dataset.stop) {
        el.dataset.stop = "1";
        el.addEventListener("click", function (e) { e.stopPropagation(); });
      }
    },
  }, props.value);
};
